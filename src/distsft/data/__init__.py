"""The data pipeline: sources -> formats (records to conversations) -> chat (render, locate assistant
spans) -> encode (tokens and labels) -> packing -> cache; collate and sampler feed the trainer.

`from distsft import data` gives the build entry points (`prepare`, `build`, `summarize`, `tokenize`,
`load_records`).
"""

from distsft.data.build import build, load_records, prepare, summarize, tokenize

__all__ = ["build", "load_records", "prepare", "summarize", "tokenize"]
