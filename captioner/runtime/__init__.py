"""How the networks run fast: the backend choice `--backend auto|torch|onnx|compiled` (backends.py), the ONNX
Runtime encoder and decoder step (onnx_encoder.py, onnx_decoder.py), the AOTInductor encoder (compiled.py), and
the worker processes that never fork a live runtime (workers.py).

May import captioner.model.checkpoint and the shared leaves; never the facade (captioner.pipeline) that uses it."""
