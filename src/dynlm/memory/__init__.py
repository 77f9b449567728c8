"""Conversation memory (three levels, SQLite) and the sentence embeddings it and the router use."""
