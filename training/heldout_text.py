"""Write the held-out files of starcoder2-nano (never trained on) as one text, each file
preceded by <|endoftext|>: the evaluation text for `starlift quantize --eval-text`.

    python training/heldout_text.py heldout.py
"""

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

from starlift.model import resolve_checkpoint

record = json.loads((resolve_checkpoint("starcoder2-nano") / "training_record.json").read_text())
stdlib = Path(sysconfig.get_paths()["stdlib"])
parts = []
for entry in record["data"]["held_out"]:
    data = (stdlib / entry["path"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        sys.exit(f"{entry['path']} differs from the file starcoder2-nano held out (another Python version?)")
    parts.append("<|endoftext|>" + data.decode("utf-8"))
Path(sys.argv[1]).write_text("".join(parts), encoding="utf-8")
print(f"wrote {sys.argv[1]}: {len(parts)} held-out files")
