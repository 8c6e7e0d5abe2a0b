"""The engine: one LoRA file or adapter folder in, one reduced file out, with its report.

`formats/` reads and writes each layout, `reduce/` is pure math on tensors, `engine.py` joins them
(the face: `reduce_file`, `plan_file`), `readback.py` checks what was written as loaders read it.
Imports nothing of library, report, daemon or cli. This file imports nothing, so a process that only
reads headers (the daemon) never loads torch.
"""
