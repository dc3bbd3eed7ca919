"""The bottom layer: the words every other layer shares (error and close codes, audio constants, our own
frame types, the typed turn and session records). It imports nothing of Atlas."""
