"""heal: train the slimmed graph itself by distillation from the float source model.

``module`` turns an onnx_ir graph into a trainable torch module with stand-ins for the passes'
decisions, ``train`` is the distillation loop, ``distributed`` runs it data-parallel and ``data``
assembles what it trains and scores on. The pass that drives them is ``slimgraph.passes.heal``.
"""
