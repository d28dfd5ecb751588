"""The Gradio web app (ui.py; started by the repository's app.py): the Image, Batch and Video tabs around one
shared Captioner.

The top: may import every other part except the CLI; nothing imports it."""
