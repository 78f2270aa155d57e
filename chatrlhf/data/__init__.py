"""Datasets: reading sources, detecting their format, validating records per stage, splitting between stages,
blending. docs/data.md describes every source, format and record schema.

Accepted sources (`load_source`):

- `.jsonl` — one JSON object per line; blank lines are ignored. Errors name "line N".
- `.json` — a JSON array of objects (errors name "item N"), or JSON Lines saved as `.json`.
- `.parquet` — read with pyarrow; errors name "row N".
- `.csv` — a header row, then one record per row; every value is a string. Errors name "row N".
- a directory written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`; for a
  `DatasetDict` the split is "train" unless the source is written `path:split`. Errors name "row N".
- a generated source such as the bundled demo's `demo:pairs:N:SEED`, written to a file first
  (`resolve_generated`, data/generated.py).
- `hf:ID[:SPLIT][?config=..&data_dir=..&data_files=..&revision=..]` — `datasets.load_dataset` on a Hub dataset
  (through the Hugging Face cache; offline mode is respected) or a local dataset directory. Errors name "row N".

Formats (`formats.py`): every source is in chatrlhf's own schema (`trl`: TRL's standard and conversational
formats) or in the schema of a public dataset with an adapter (`hh-rlhf`, `rm-static`, `shp`, `webgpt`,
`ultrafeedback`, `oasst`), detected from its columns or chosen with `load_source(spec, format=NAME)`.

Record schemas (extra fields are allowed; RL prompts keep them in `PromptRecord.extra` for reward functions):

- SFT (`to_sft`): `{"messages": [{"role", "content"}, ...]}` with roles system/user/assistant, at least one user
  turn and a final assistant turn; `{"prompt", "completion"}` or `{"prompt", "response"}`; a pair record (its
  `chosen` is the response); or `{"text"}` (learned whole, without the chat template).
- Pairs for the reward model and DPO (`to_pair`): `{"prompt", "chosen", "rejected"}`, or `{"chosen", "rejected"}`
  with an implicit prompt, as strings or as conversations, with `chosen` != `rejected`.
- RL prompts (`to_prompt`): `{"prompt": str or turns, ...}`, `{"messages": [...], ...}` or a pair; a final
  assistant turn is dropped and the conversation must then end with a user turn.

Strings must be non-blank. Every error is a `DataError` naming the source, the record's position and the field.
"""

from chatrlhf.data.blend import blend, blend_counts, parse_split, split_for_stages
from chatrlhf.data.formats import FORMAT_CHOICES, FORMATS
from chatrlhf.data.generated import resolve_generated
from chatrlhf.data.records import PairRecord, PromptRecord, SFTRecord, to_pair, to_prompt, to_sft, validate_all
from chatrlhf.data.sources import RawRecord, load_source

__all__ = [
    "resolve_generated",
    "FORMATS",
    "FORMAT_CHOICES",
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
