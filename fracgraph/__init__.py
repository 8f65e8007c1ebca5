"""fracgraph: FracTrain-style fractional quantized training for ONNX models on onnxruntime-training."""

__version__ = "0.1.0"
