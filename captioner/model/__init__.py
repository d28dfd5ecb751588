"""The networks and what they need to be saved and read back: the CNN encoder (encoder.py), the attention LSTM
decoder (decoder.py), beam search over it (search.py), the vocabulary (vocab.py) and checkpoints (checkpoint.py).

Imports only the shared leaves (captioner.errors, captioner.cpu): nothing here knows how it is run fast, how
it is trained, or who calls it."""
