"""Graph rewrites, one per file. Forward passes run before onnxruntime writes the backward graph; training-
and eval-graph passes run on the artifacts it writes."""
