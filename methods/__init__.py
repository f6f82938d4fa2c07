"""methods: segmentation methods that run on cached feature sets, and their shared building blocks.

Shared blocks (``spec/METHODS.md`` §0): ``scoring`` (sliding-window merge and the SCLIP-lineage
post-processing of dense logits, exact and fast on CPU), ``prototype`` (nearest-prototype lookup
with torch and FAISS backends) and ``metrics`` (the mmseg ``IoUMetric`` accumulator).
"""
