"""Read-only analyses of ONNX graphs: the GEMM op table, training-step op lists, effective MACs."""
