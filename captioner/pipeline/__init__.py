"""The facade: which engine runs a model (load.py: the light LiteCaptioner for a bundle, or the torch `Captioner`
of captioner.py for a checkpoint, its runtime wired in; `from captioner import Captioner` is load.py's front door)
and the batch pipeline (batch.py: files -> workers ->
captions -> rows in CSV/JSONL), Parquet output (parquet.py) and Ray Data as the engine over shards
(distributed.py).

May import captioner.runtime, captioner.media, captioner.model.checkpoint and the shared leaves; never the CLI, the
app or training."""
