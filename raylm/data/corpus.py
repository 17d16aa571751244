"""Real-text corpora with controlled edits, for the bundled sample and the dedup bench.

Generated prose would make dedup look better than it is; license texts are real,
repetitive prose with natural near-duplicates (GPL vs LGPL paragraphs), and controlled
edits (word substitutions, deletions, truncation) add near-duplicates whose similarity
is known only after measuring it exactly.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from raylm.models.tiny import CORPUS_DIR

SAMPLE_DIR = Path(__file__).parent / "sample"


def paragraphs(min_words: int = 30, extra_dirs: tuple[str, ...] = ()) -> list[str]:
    """Distinct paragraphs of the bundled license corpus (plus any extra text directories)."""
    files = sorted(CORPUS_DIR.glob("*.txt"))
    for d in extra_dirs:
        files += sorted(p for p in Path(d).glob("*") if p.is_file())
    seen: dict[str, None] = {}
    for f in files:
        text = f.read_text(errors="ignore")
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para.split()) >= min_words:
                seen.setdefault(para, None)
    return list(seen)


def edit(text: str, rng: random.Random, rate: float) -> str:
    """Substitute or delete about ``rate`` of the words: a near-duplicate of ``text``."""
    words = text.split()
    out = []
    for w in words:
        r = rng.random()
        if r < rate / 2:
            continue
        out.append(rng.choice(words) if r < rate else w)
    return " ".join(out)


def _sample_pt(rng: random.Random) -> tuple[list[str], dict[str, int]]:
    base = paragraphs()[:120]
    lines = [json.dumps({"text": p}) for p in base]
    plan = {"base": len(base)}
    for p in base[:10]:  # exact duplicates up to case and spacing
        lines.append(json.dumps({"text": "  " + p.upper().replace(" ", "   ") + " "}))
    for i, p in enumerate(base[10:25]):  # near duplicates, some above the threshold, some below
        near = p + " This notice is current." if i % 2 else edit(p, rng, 0.12)
        lines.append(json.dumps({"text": near}))
    pii = [
        "Contact the maintainer at jane.doe@example.org or +44 20 7946 0958 for a copy of this license.",
        "如需许可证副本，请致电 13812345678 或发送邮件至 license@example.cn 联系我们的团队。",
        "The build server at 10.20.30.40 and 2001:db8::1 mirrors the sources for every release.",
        "Donations by card 4532 0151 1283 0366 are processed by the foundation every month of the year.",
        "身份证号码 11010519491231002X 的持有人已经签署了本许可证的贡献者协议并同意其条款。",
    ]
    lines += [json.dumps({"text": t}, ensure_ascii=False) for t in pii]
    bad_quality = [
        "$$$ ### @@@ !!! %%% ^^^ &&& *** $$$ ### @@@ !!! %%% ^^^ &&& *** ~~~ <<< >>>",
        "buy now\nbuy now\nbuy now\nbuy now\nbuy now\nbuy now",
        "ok",
        "control\x07chars\x08in\x1bthe middle of this otherwise ordinary sentence here",
    ]
    lines += [json.dumps({"text": t}) for t in bad_quality]
    malformed = ['{"text": "unterminated', '["a", "list"]', '{"text": 42}', '{"body": "no text"}']
    lines += malformed
    plan.update(exact=10, near=15, pii=len(pii), bad=len(bad_quality), malformed=len(malformed))
    return lines, plan


def build_sample(out_dir: Path = SAMPLE_DIR, seed: int = 0) -> dict[str, int]:
    """Write the bundled sample corpus: pt, alpaca, sharegpt, preference, a registry."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines, plan = _sample_pt(rng)
    body = "\n".join(lines).encode() + b"\n" + b'{"text": "bad bytes \xff\xfe here"}\n'
    (out_dir / "pt.jsonl").write_bytes(body)
    paras = paragraphs()[120:200]
    alpaca = [
        {
            "instruction": "Summarise this license clause.",
            "input": p,
            "output": p.split(".")[0] + ".",
        }
        for p in paras[:30]
    ]
    alpaca.append({"instruction": "No answer here."})  # malformed: no output
    (out_dir / "alpaca.json").write_text(json.dumps(alpaca, indent=1))
    share = [
        {
            "conversations": [
                {"from": "human", "value": f"What does this say? {p}"},
                {"from": "gpt", "value": p.split(".")[0] + "."},
            ]
        }
        for p in paras[30:60]
    ]
    share.append({"conversations": [{"from": "robot", "value": "?"}]})  # malformed role
    (out_dir / "sharegpt.jsonl").write_text("\n".join(json.dumps(s) for s in share) + "\n")
    prefs = [
        {
            "prompt": f"Quote the first sentence of: {p}",
            "chosen": p.split(".")[0] + ".",
            "rejected": "I will not.",
        }
        for p in paras[60:80]
    ]
    prefs.append({"prompt": "missing answers"})
    (out_dir / "preference.jsonl").write_text("\n".join(json.dumps(s) for s in prefs) + "\n")
    registry = {
        "license_alpaca": {"file_name": "alpaca.json"},
        "license_sharegpt": {
            "file_name": "sharegpt.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations"},
        },
        "license_pref": {
            "file_name": "preference.jsonl",
            "ranking": True,
            "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
        },
    }
    (out_dir / "dataset_info.json").write_text(json.dumps(registry, indent=2))
    return plan


if __name__ == "__main__":
    print(build_sample())
