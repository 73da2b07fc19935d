"""edgesplit.device.bundle: the device front as a LiteRT model, in a self-describing bundle.

- `flatbuf`: a TFLite flatbuffer written with ai-edge-litert's schema (no TensorFlow, no PyTorch).
- `front_graph`: the embedding and layers [0, cut) as LiteRT operators (decode, prefill_T).
- `litert_front`: that model run by ai-edge-litert's interpreter, as a front segment.
- `bundle`: the folder (manifest with format version and checksums, front.tflite, tokenizer,
  codec table, daemon config), written atomically and verified on load.
"""
