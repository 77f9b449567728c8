"""Serving: the OpenAI-compatible server, the experts registry and router, the chat page.

    dynlm serve --model smollm2/ --port 8000
    dynlm serve --experts experts.yaml --db memory.sqlite
"""
