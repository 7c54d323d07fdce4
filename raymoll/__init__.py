"""raymoll: robust, calibrated classifiers by data mollification coupled with label smoothing."""
__version__ = "0.1.0"
