"""The torch-free inference core (issue 26): Pillow/NumPy preprocessing (preprocess.py), greedy and beam search in
NumPy over any step function (search.py), the Caption a captioner returns (caption.py), and `LiteCaptioner`
(captioner.py), which runs a model bundle (encoder.onnx, decoder_init.onnx, decoder_step.onnx, model.json; written by
`captioner export-onnx`) in ONNX Runtime.

Imports numpy, Pillow, onnxruntime (on first use) and the shared leaves only: never torch. May be imported by every
other part; tests/test_lite.py runs it where `import torch` fails."""
