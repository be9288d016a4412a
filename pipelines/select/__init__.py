"""Phase 2 (``mmcurate select``): rules, top fractions and dedup over an annotated output."""
