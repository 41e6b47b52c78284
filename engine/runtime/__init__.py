"""Where weights live and how they compute: the weight chokepoint (ops), the memory manager, device choice."""
