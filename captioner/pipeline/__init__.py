"""The facade: `Captioner` (captioner.py: a checkpoint loaded, the runtime wired in, images in, captions out;
also `from captioner import Captioner, Caption`) and the batch pipeline (batch.py: files -> workers ->
captions -> rows in CSV/JSONL), Parquet output (parquet.py) and Ray Data as the engine over shards
(distributed.py).

May import captioner.runtime, captioner.media, captioner.model.checkpoint and the shared leaves; never the CLI, the
app or training."""
