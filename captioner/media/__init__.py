"""Files in and out: images (images.py), video frames and subtitles (video.py), photo metadata through exiftool
(metadata.py), the SQLite caption library and its search (library.py), tags from captions (tags.py), WebDataset
shards and path lists as inputs (shards.py).

May import captioner.model.checkpoint (the vocabulary's tokenizer) and the shared leaves; used by the pipeline, the CLI
and the app alike."""
