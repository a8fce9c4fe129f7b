"""docs/API.md documents the public API as it is: every public name has an entry, every documented
signature equals the code's, and every documented name exists. Adding a public function without
documenting it, or changing a signature, fails here."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

import mhr_ops

API_MD = Path(__file__).resolve().parent.parent / "docs" / "API.md"
# Pages of the reference that document names with signature entries (API.md links to the others).
API_PAGES = (API_MD, API_MD.parent / "API-moe.md")
SIGNATURE = re.compile(r"<!-- signature -->\n```python\n(?P<line>[^\n]*)\n```")
LINE = re.compile(r"(?P<name>mhr_ops(?:\.\w+)+)(?P<params>\(.*\))")

# Public modules of the package whose public functions and classes are documented one by one.
SUBMODULES = ("nn", "peft", "reference")
# Defined in mhr_ops.peft without a leading underscore but internal: helpers of accelerate and of
# merge_task, not part of the API.
INTERNAL = {"mhr_ops.peft.accelerated_forward", "mhr_ops.peft.peft_task_delta"}


def documented() -> dict[str, str]:
    """Documented name -> its parameter list as written, e.g. '(model, n_tasks=None)'."""
    text = "\n".join(page.read_text() for page in API_PAGES)
    lines = [m.group("line") for m in SIGNATURE.finditer(text)]
    markers = re.findall(r"^<!-- signature -->$", text, flags=re.MULTILINE)
    assert len(lines) == len(markers), "a <!-- signature --> marker without a ```python line after it"
    docs = {}
    for line in lines:
        m = LINE.fullmatch(line)
        assert m, f"unparsable signature line: {line!r}"
        assert m.group("name") not in docs, f"{m.group('name')} is documented twice"
        docs[m.group("name")] = m.group("params")
    return docs


def resolve(name: str):
    """The object a dotted name denotes (mhr_ops.peft is imported on first use)."""
    parts = name.split(".")
    obj = mhr_ops
    for i, part in enumerate(parts[1:], start=1):
        if obj is mhr_ops and part in SUBMODULES:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        else:
            obj = getattr(obj, part)
    return obj


def plain_signature(name: str) -> str:
    """The signature as documented: no annotations, no return annotation, no self; a class shows
    its __init__, a method leaves out self."""
    obj = resolve(name)
    drop_first = False
    if inspect.isclass(obj):
        obj, drop_first = obj.__init__, True
    elif inspect.isclass(resolve(name.rsplit(".", 1)[0])):
        drop_first = True  # a method, looked up on its class
    sig = inspect.signature(obj)
    params = list(sig.parameters.values())[1 if drop_first else 0 :]
    params = [p.replace(annotation=inspect.Parameter.empty) for p in params]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def public_names() -> set[str]:
    """Every public callable: mhr_ops.__all__ (its modules expanded into their own public
    functions and classes)."""
    names = set()
    for name in mhr_ops.__all__:
        if inspect.ismodule(getattr(mhr_ops, name)):
            continue
        names.add(f"mhr_ops.{name}")
    for sub in SUBMODULES:
        module = importlib.import_module(f"mhr_ops.{sub}")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                names.add(f"mhr_ops.{sub}.{name}")
    return names - INTERNAL


def test_the_signature_lines_parse():
    assert len(documented()) > 20


def test_every_public_name_is_documented():
    pytest.importorskip("peft")
    missing = sorted(public_names() - set(documented()))
    assert not missing, f"public but not in docs/API.md: {missing}"
    for name in mhr_ops.__all__:  # the modules of __all__ have their own sections
        assert inspect.ismodule(getattr(mhr_ops, name)) or f"mhr_ops.{name}" in documented()
    for name in ("mhr_ops.peft.accelerate", "mhr_ops.peft.enable", "mhr_ops.peft.disable"):
        assert name in documented()


def test_every_documented_name_exists():
    pytest.importorskip("peft")
    for name in documented():
        try:
            resolve(name)
        except AttributeError:
            pytest.fail(f"docs/API.md documents {name}, which does not exist")


def test_documented_signatures_match_the_code():
    pytest.importorskip("peft")
    wrong = {}
    for name, params in documented().items():
        try:
            actual = plain_signature(name)
        except AttributeError:
            actual = "(no such object)"
        if params != actual:
            wrong[name] = f"documented {params}, code {actual}"
    assert not wrong, "signatures in docs/API.md differ from the code:\n" + "\n".join(
        f"  {n}: {w}" for n, w in wrong.items()
    )


def test_mixture_of_lora_experts_is_documented_with_its_cuda_status():
    """The CUDA kernels exist (SIMT and tensor cores) but have not run on a GPU: the support table
    says so, and nothing still calls them planned."""
    text = API_MD.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `moe_lora`"))
    assert "tensor cores" in row and "not yet run on a GPU" in row
    assert "## Planned" not in text and "designed but not written" not in text
    assert "API-moe.md" in text
    names = {n.rsplit(".", 1)[-1] for n in documented()}
    for name in ("moe_lora", "MoELoRALinear", "patch_moe_lora", "moe_aux_loss"):
        assert name in names, f"{name} has no signature entry"


def test_no_pointer_to_the_internal_spec():
    """Users do not have SPEC.md: README and the package's docstrings point to docs/API.md."""
    root = API_MD.parent.parent
    for path in [root / "README.md", *sorted((root / "mhr_ops").glob("*.py"))]:
        text = path.read_text()
        assert "SPEC.md" not in text and "SPEC section" not in text, f"{path.name} still points to SPEC"
