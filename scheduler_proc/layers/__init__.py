"""Model building blocks, one layer kind per file; each uses a fused GPU kernel when one is available."""
