"""The data pipeline: sources -> formats (records to conversations) -> chat (render, locate assistant
spans) -> examples/encode (tokens and labels) -> overlong -> packing -> pack_write -> cache, built by
data.build (streaming, parallel); data.split hands a split from the cache to the ranks; collate and
sampler feed the trainer. Import the modules themselves: this package re-exports nothing."""
