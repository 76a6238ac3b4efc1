"""The method: the introspective similarity metric, its PML distance, the losses and the
two-head model. No data sets, no run folders."""
