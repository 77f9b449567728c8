"""The code-checkpoint loader's budgets: amplification files (few bytes on disk, a lot of work or
memory for a naive loader) are refused before they are parsed or allocated. Each is loaded in a
fresh process (NumPy and the loader only); the growth of its peak resident memory over the
memory before the load must stay under 10x the file's size.

The peak is the kernel's high-water mark of the process's memory (`VmHWM`), reset to the current
size just before the load (`/proc/self/clear_refs`). `resource.getrusage().ru_maxrss` would be
wrong here: Linux carries the parent's peak across fork + exec into the child's figure, so a
child of the test process starts with pytest's peak."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dynlm
from dynlm.errors import CheckpointError
from dynlm.weights import LoadLimits, UnsafeCheckpointError, export_code_checkpoint, load_code_checkpoint
from dynlm.weights.format import IMPORT_LINE
from dynlm.weights.safe_loader import parse_file
from dynlm.weights.store import CodeCheckpoint

SRC = Path(__file__).resolve().parents[1] / "src"

# the loader runs in a fresh process: NumPy and the loader only, then the peak RSS is read
MEASURE = textwrap.dedent("""
    import json, sys
    from dynlm.weights.store import CodeCheckpoint
    from dynlm.errors import CheckpointError

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current size
    before = status("VmRSS")
    try:
        CodeCheckpoint(sys.argv[1])
        outcome = "loaded"
    except CheckpointError as e:
        outcome = str(e)
    print(json.dumps({"growth": status("VmHWM") - before, "outcome": outcome}))
""")


def measure(folder: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True,
                            timeout=120, env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def weights_file(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "weights.py"
    path.write_text(f'"""hostile"""\n\n{IMPORT_LINE}\n\nFORMAT = "dynlm-weights-as-code"\nVERSION = 1\n{body}')
    return path


def cell(name: str, shape: tuple[int, ...], payload: str, dtype: str = "float32") -> str:
    return f'Cell(name="{name}", shape={shape!r}, dtype="{dtype}", sha256=None, data={payload})'


def amplification_files(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (folder, what the refusal names)."""
    files = {}
    # 2.1M items in one list: 4.2 MB of text, 4.2M tokens (CPython needs ~200 bytes per token)
    weights_file(root / "flat", "MODEL = [" + "1," * 2_100_000 + "]\nCELLS = []\n")
    files["long flat list"] = (root / "flat", "tokens=")
    # the report's file: 4 MB of newline-separated 1s (2M statements)
    weights_file(root / "lines", "1\n" * 2_000_000)
    files["newline-separated ones"] = (root / "lines", "statements=")
    # 1M brackets deep
    weights_file(root / "deep", "MODEL = " + "[" * 1_000_000 + "]" * 1_000_000 + "\nCELLS = []\n")
    files["deep nesting"] = (root / "deep", "depth=")
    # a 2^40-element tensor declared next to 20 bytes of payload, in a file padded with a real
    # 1 MB tensor (raw byte planes) so that the measurement has something to compare with
    real = "Inline(planes=" + repr((("raw", 262144),) * 4) + ', b85="' + "0" * 1_310_720 + '")'
    huge = "Inline(planes=" + repr((("zlib", 4),) * 4) + ', b85="' + "0" * 20 + '")'
    weights_file(root / "huge", "MODEL = {}\nCELLS = [\n    " + cell("real", (262144,), real) + ",\n    "
                 + cell("huge", (1 << 20, 1 << 20), huge) + ",\n]\n")
    files["huge declared shape, tiny payload"] = (root / "huge", "cannot hold")
    # 200k one-value tensors: 25 tokens each
    weights_file(root / "many", "MODEL = {}\nCELLS = [\n" + "".join(
        f"    {cell(f'c{i}', (1,), 'Literal([0.0])')},\n" for i in range(200_000)) + "]\n")
    files["many small tensors"] = (root / "many", "tokens=")
    return files


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return amplification_files(tmp_path_factory.mktemp("amplification"))


@pytest.mark.parametrize("name", ["long flat list", "newline-separated ones", "deep nesting",
                                  "huge declared shape, tiny payload", "many small tensors"])
def test_amplification_files_refused_in_bounded_memory(hostile, name):
    folder, names = hostile[name]
    size = (folder / "weights.py").stat().st_size
    got = measure(folder)
    assert got["outcome"] != "loaded" and names in got["outcome"], got["outcome"]
    assert got["growth"] < 10 * size, f"{name}: peak RSS grew by {got['growth'] / 1e6:.1f} MB for a " \
                                      f"{size / 1e6:.1f} MB file"


def test_refusal_names_the_limit_and_how_to_raise_it(tmp_path):
    path = tmp_path / "config.py"
    path.write_text("VALUES = [" + "1, " * 50 + "]\n")
    with pytest.raises(UnsafeCheckpointError) as refused:
        parse_file(path, "literals", LoadLimits(tokens=40))
    assert "limit tokens=40" in str(refused.value) and "LoadLimits(tokens=" in str(refused.value)
    assert "DYNLM_LOAD_LIMITS" in str(refused.value)
    assert parse_file(path, "literals", LoadLimits(tokens=200)).variables["VALUES"] == [1] * 50


def test_limits_are_user_settable_per_call_and_by_environment(tmp_path, monkeypatch):
    model = dynlm.build_model("standard-tiny", vocab_size=64, num_layers=1, hidden_size=32, num_heads=2,
                              num_kv_heads=1, intermediate_size=64)
    code = export_code_checkpoint(model, tmp_path / "code")
    load_code_checkpoint(code)  # the defaults admit what dynlm writes
    with pytest.raises(UnsafeCheckpointError, match="tensor_bytes"):
        load_code_checkpoint(code, limits=LoadLimits(tensor_bytes=1000))
    monkeypatch.setenv("DYNLM_LOAD_LIMITS", "tokens=50")
    with pytest.raises(UnsafeCheckpointError, match="limit tokens=50"):
        CodeCheckpoint(code)
    monkeypatch.setenv("DYNLM_LOAD_LIMITS", "tokens=lots")
    with pytest.raises(CheckpointError, match="DYNLM_LOAD_LIMITS: bad item"):
        CodeCheckpoint(code)


def test_config_claiming_a_huge_model_is_refused_before_allocating(tmp_path):
    """config.py may claim any model size; the model is sized against the cells first on the
    meta device, so a huge claim next to small cells allocates nothing."""
    model = dynlm.build_model("standard-tiny", vocab_size=64, num_layers=1, hidden_size=32, num_heads=2,
                              num_kv_heads=1, intermediate_size=64)
    code = export_code_checkpoint(model, tmp_path / "code")
    config = (code / "config.py").read_text()
    assert '"vocab_size": 64' in config
    (code / "config.py").write_text(config.replace('"vocab_size": 64', '"vocab_size": 4000000000'))
    allocated = []
    original = torch.nn.Embedding.__init__

    def spy(self, num, dim, *args, **kwargs):
        allocated.append((num, torch.empty(()).device.type))  # the device tensors are created on
        original(self, num, dim, *args, **kwargs)

    torch.nn.Embedding.__init__ = spy
    try:
        with pytest.raises(CheckpointError, match="config"):
            load_code_checkpoint(code)
    finally:
        torch.nn.Embedding.__init__ = original
    assert (4_000_000_000, "meta") in allocated  # sized on the meta device ...
    assert (4_000_000_000, "cpu") not in allocated  # ... and never for real


def test_prescan_ignores_brackets_and_statements_inside_strings(tmp_path):
    text = 'MODEL = {"a": "[[[[[[[[;\\n;\\n", "b": \'\'\'((((((((\n;\n;\n\'\'\'}  # [[[[[[[[\nCELLS = []\n'
    path = weights_file(tmp_path, text)
    parsed = parse_file(path, limits=LoadLimits(depth=2, statements=6))
    assert parsed.variables["MODEL"]["a"] == "[[[[[[[[;\n;\n"
