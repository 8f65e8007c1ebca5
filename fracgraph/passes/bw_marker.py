"""Mark the error tensor of every quantized GEMM for BW quantization.

An Identity named `<gemm>::bwq` after the GEMM output survives artifact generation, and onnxruntime names its
gradient node `<gemm>::bwq_Grad/Identity_0`: the input of that node is dL/d(GEMM output) after BN's backward,
which `BwQuantPass` replaces with the stochastic quantizer. One quantized error then feeds both the error GEMM
and the weight-gradient GEMM (spec §1.2).
"""

from __future__ import annotations

from .base import Pass, PassResult, node_by_name

MARKER = "::bwq"


def marker_name(gemm: str) -> str:
    return gemm + MARKER


def gradient_node_name(gemm: str) -> str:
    return marker_name(gemm) + "_Grad/Identity_0"


class BwMarkerPass(Pass):
    name = "bw-marker"

    def __init__(self, gemms: list[str]):
        self.gemms = gemms

    def call(self, model):
        from onnx import helper

        nodes = node_by_name(model)
        graph_outputs = {o.name for o in model.graph.output}
        for name in self.gemms:
            node = nodes[name]
            y = node.output[0]
            marked = f"{name}{MARKER}/in"
            node.output[0] = marked
            # the Identity keeps the original tensor name, so consumers and graph outputs need no rewiring
            model.graph.node.append(helper.make_node("Identity", [marked], [y], name=marker_name(name)))
            if y in graph_outputs:
                pass  # the model output keeps its name through the Identity
        return PassResult(model, bool(self.gemms), [f"{g}: error marker" for g in self.gemms])

    def ensures(self, model):
        nodes = node_by_name(model)
        for g in self.gemms:
            assert marker_name(g) in nodes, f"marker for {g} missing"
