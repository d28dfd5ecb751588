"""Training and scoring: datasets and the feature cache (data.py), the training loop (train.py), self-critical
training (scst.py), BLEU/CIDEr-D/ROUGE-L/METEOR and attention statistics (metrics.py), `evaluate`, and
`export-onnx`'s model bundles for the torch-free captioner (bundle.py).

May import the pipeline (evaluate decodes with a Captioner), runtime, media, model and the shared leaves; never
the CLI or the app."""
