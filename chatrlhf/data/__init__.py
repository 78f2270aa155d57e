"""Datasets: reading sources, validating records per stage, splitting between stages, blending.

Accepted sources (`load_source`):

- `.jsonl` — one JSON object per line; blank lines are ignored. Errors name "line N".
- `.json` — a JSON array of objects (errors name "item N"), or JSON Lines saved as `.json`.
- `.parquet` — read with pyarrow; errors name "row N".
- `.csv` — a header row, then one record per row; every value is a string. Errors name "row N".
- a directory written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`; for a
  `DatasetDict` the split is "train" unless the source is written `path:split`. Errors name "row N".
- a generated source such as the bundled demo's `demo:pairs:N:SEED`, written to a file first
  (`resolve_generated`, data/generated.py).

Record schemas (extra fields are allowed; RL prompts keep them in `PromptRecord.extra` for reward functions):

- SFT (`to_sft`): `{"prompt": str, "response": str}`, or `{"messages": [{"role", "content"}, ...]}` with roles
  system/user/assistant, at least one user turn and a final assistant turn, or a pair record (its `chosen`
  is the response).
- Pairs for the reward model and DPO (`to_pair`): `{"prompt": str, "chosen": str, "rejected": str}`, with
  `chosen` != `rejected`.
- RL prompts (`to_prompt`): `{"prompt": str, ...}` or `{"messages": [...], ...}`; a final assistant turn in
  `messages` is dropped and the conversation must then end with a user turn.

Strings must be non-blank. Every error is a `DataError` naming the source, the record's position and the field.
"""

from chatrlhf.data.blend import blend, blend_counts, parse_split, split_for_stages
from chatrlhf.data.generated import resolve_generated
from chatrlhf.data.records import PairRecord, PromptRecord, SFTRecord, to_pair, to_prompt, to_sft, validate_all
from chatrlhf.data.sources import RawRecord, load_source

__all__ = [
    "resolve_generated",
    "PairRecord",
    "PromptRecord",
    "RawRecord",
    "SFTRecord",
    "blend",
    "blend_counts",
    "load_source",
    "parse_split",
    "split_for_stages",
    "to_pair",
    "to_prompt",
    "to_sft",
    "validate_all",
]
