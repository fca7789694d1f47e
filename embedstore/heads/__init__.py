"""Few-shot heads over L2-normalised vectors, behind one interface (see base.Head)."""
