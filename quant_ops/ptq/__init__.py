"""Post-training quantization beyond plain calibration: DFQ, ZeroQ, EasyQuant and
layer sensitivity, each a function of a (graph, params) pair."""
