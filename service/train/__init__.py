"""Training loops for the learned parts of scatterflow (``scatterflow train ...``)."""
