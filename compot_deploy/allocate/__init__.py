"""allocate: split a byte budget across layers. knapsack (the pure solver), ratio (uniform / dynamic / mckp plans
for one factorization method), joint (every storage of every layer, measured)."""
