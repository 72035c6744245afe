"""kNN search, re-ranking and the Kaggle metrics (the `landmark-evaluate` stage).

Reads: `.npz` embedding sets (index, queries, train) and the Kaggle solution CSVs.
Writes: a metrics JSON (mAP@100, GAP, revisitop mAP) and Kaggle submission CSVs.
Entry: `evaluation.evaluate(EvalConfig)`. `embeddings` loads the sets, `knn` searches with faiss,
`rerank` has alpha-QE / DBA, `metrics` and `solutions` score as Kaggle did, `revisitop` is the
Revisited Oxford/Paris protocol.
"""
