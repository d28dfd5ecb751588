"""The `captioner` command: main.py parses and dispatches (and holds train/evaluate/cache/export), caption.py,
video.py and backend.py (info, calibrate) are their subcommands; cluster.py is caption's --ray.

The top: may import every other part except the app; nothing imports it."""
