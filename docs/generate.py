"""Write the per-method pages ``docs/methods/<name>.md`` from the code: each method's and
trainer's module docstring, its typed config (every option, type, default and help, as
``ovss methods`` shows them), its per-dataset presets and the published numbers ``ovss eval
--check-reference`` compares with. Run after changing a method::

    .venv/bin/python docs/generate.py

Pointers to developer notes outside the repository are rewritten to in-repository pages.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCHMARKS = (
    "voc21",
    "context60",
    "coco_object",
    "voc20",
    "context59",
    "coco_stuff171",
    "cityscapes",
    "ade20k",
)
PAPERS = {
    "000": "the FMbSeg paper",
    "001": "the SimZSS paper",
    "002": "the PixelCLIP paper",
    "003": "the PnP-OVSS paper",
    "004": "the Trident paper",
}


_SECTIONS = r"(?:\s*§[\d.]+(?:\s*(?:/|and|,)\s*§?[\d.]+)*)?(?:\s*(?:step|item)\s*\d+)?"


def user_text(text: str) -> str:
    """Developer pointers -> in-repository pages."""
    tick = r"(?:`{1,2})?"
    text = re.sub(rf"{tick}(?:spec/)?EVAL\.md{tick}{_SECTIONS}", "docs/evaluation.md", text)
    text = re.sub(rf"{tick}(?:spec/)?METHODS\.md{tick}{_SECTIONS}", "\0", text)
    text = re.sub(rf"{tick}(?:spec/)?(?:PRODUCT|STYLE)\.md{tick}{_SECTIONS}", "the README", text)
    text = re.sub(r"\bpaper (00\d)\b", lambda m: PAPERS.get(m.group(1), "the paper"), text)
    # bare section numbers of the developer notes: dropped (the scoring: docs/evaluation.md)
    text = re.sub(r"§0\.2\s+scoring", "the shared scoring (docs/evaluation.md)", text)
    bare = r"§\d[\d.]*(?:/§?\d[\d.]*)*(?:\s*(?:step|item)s?\s*[\d, -]+)?"
    text = re.sub(rf"\(\s*{bare}\s*[;,]\s*", "(", text)
    text = re.sub(rf"\s*[;,]\s*{bare}\s*\)", ")", text)
    text = re.sub(rf"\s*\(\s*{bare}\s*\)", "", text)
    text = re.sub(rf"{bare}", "\0", text)
    text = re.sub(r"\s*\(\s*\0\s*\)", "", text)  # \0 marks a dropped developer pointer
    text = re.sub(r"\s*[;,]\s*\0", "", text)
    text = re.sub(r"\0\s*[;,]\s*", "", text)
    text = text.replace("\0", "the method")
    return text.replace("../shared/", "")


def _md_cell(v: object) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def page(kind: str, name: str, cls: type, options: list[dict], refs: list) -> str:
    module = sys.modules[cls.__module__]
    lines = [f"# `{name}` ({kind})", ""]
    doc = inspect.cleandoc(module.__doc__ or "")
    if doc:
        lines += [user_text(doc), ""]
    cdoc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]
    if cdoc and cdoc not in doc:
        lines += [user_text(cdoc), ""]
    where = "`ovss methods`" if kind == "method" else f"`ovss align --method {name} --help`"
    lines += [
        "## Options",
        "",
        f"Set with `--set KEY=VALUE` (or a `--config` JSON file); {where} prints the same "
        "table. [ours] marks our own choices where the authors are silent.",
        "",
        "| option | type | default | help |",
        "|---|---|---|---|",
    ]
    for o in options:
        default = "(required)" if o.get("required") else json.dumps(o.get("default"))
        help_text = o.get("help", "")
        if o.get("choices"):
            help_text += f" Choices: {', '.join(str(c) for c in o['choices'])}."
        lines.append(
            f"| `{o['name']}` | {_md_cell(o['type'])} | `{_md_cell(default)}` | "
            f"{_md_cell(user_text(help_text))} |"
        )
    presets = {d: cls.presets(d) for d in BENCHMARKS}
    presets = {d: p for d, p in presets.items() if p}
    if presets:
        lines += ["", "## Per-dataset presets", "", "Applied before `--set` (which wins).", ""]
        lines += ["| dataset | options |", "|---|---|"]
        for d, p in presets.items():
            shown = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in p.items())
            lines.append(f"| {d} | {_md_cell(shown)} |")
    if refs:
        cols = [c for c in BENCHMARKS if any(c in r.miou for r in refs)]
        lines += [
            "",
            "## Reference numbers (mIoU, %)",
            "",
            "What `ovss eval --check-reference` compares a result with (only when the "
            "configuration matches; see docs/evaluation.md).",
            "",
            "| setting | source | " + " | ".join(cols) + " |",
            "|---|---|" + "---|" * len(cols),
        ]
        for r in refs:
            vals = " | ".join(f"{r.miou[c]:.2f}" if c in r.miou else "-" for c in cols)
            lines.append(f"| {_md_cell(r.setting)} | {_md_cell(user_text(r.source))} | {vals} |")
    lines += ["", "See also: [all methods](README.md), [evaluation](../evaluation.md).", ""]
    return "\n".join(lines)


def _options(config_cls: type) -> list[dict]:
    """Option rows of a config dataclass, as ``describe_methods`` makes them."""
    import dataclasses

    from methods.config import config_fields

    def plain(value):
        if value is dataclasses.MISSING:
            return None
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        if hasattr(value, "to_dict"):
            return value.to_dict()
        return list(value) if isinstance(value, tuple) else value

    return [
        {
            "name": f.name,
            "type": f.type_name,
            "default": plain(f.default),
            "required": f.default is dataclasses.MISSING,
            "help": " ".join(f.help.replace("``", "").split()),
            "choices": [plain(c) for c in f.choices],
        }
        for f in config_fields(config_cls)
    ]


def main() -> None:
    from methods.base import get_method, list_methods
    from methods.reference import REFERENCES
    from methods.segment import describe_methods
    from methods.train import get_trainer, list_trainers

    out = ROOT / "docs" / "methods"
    out.mkdir(parents=True, exist_ok=True)
    index = [
        "# Methods",
        "",
        "Segmentation methods (`ovss segment/eval --method NAME`) and trainers (`ovss align "
        "--method NAME`). Each page: what it computes, its options and defaults ([ours] marks "
        "our own choices), its per-dataset presets and its published numbers.",
        "",
        "| name | kind | summary |",
        "|---|---|---|",
    ]
    rows = {r["name"]: r for r in describe_methods()}
    written = []
    for name in list_methods():
        cls = get_method(name)
        refs = [r for r in REFERENCES if r.method == name]
        text = page("method", name, cls, rows[name]["options"], refs)
        (out / f"{name}.md").write_text(text)
        written.append(name)
        index.append(f"| [{name}]({name}.md) | method | {_md_cell(user_text(rows[name]['doc']))} |")
    for name in list_trainers():
        cls = get_trainer(name)
        fname = name if name not in written else f"{name}-train"
        text = page("trainer", name, cls, _options(cls.Config), [])
        (out / f"{fname}.md").write_text(text)
        summary = (inspect.cleandoc(cls.__doc__ or "").split("\n") or [""])[0]
        index.append(f"| [{name}]({fname}.md) | trainer | {_md_cell(user_text(summary))} |")
    (out / "README.md").write_text("\n".join(index) + "\n")
    print(f"wrote {len(index) - 7} pages in {out}")


if __name__ == "__main__":
    main()
