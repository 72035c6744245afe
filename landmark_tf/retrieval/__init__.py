"""kNN search, re-ranking and the Kaggle metrics (the `landmark-evaluate` stage).

Reads: `.npz` embedding sets (index, queries, train) and the Kaggle solution CSVs.
Writes: a metrics JSON (mAP@100, GAP, revisitop mAP) and Kaggle submission CSVs.
Entry: `evaluation.evaluate(EvalConfig)`. `embeddings` reads/writes the sets in chunks (over
`npzstream`, member by member), `knn` searches with faiss (the database lives only in the faiss
index), `rerank` has alpha-QE / DBA, `recognition_eval` the GAP half, `eval_report` the results,
`metrics` and `solutions` score as Kaggle did, `revisitop` is the Revisited Oxford/Paris protocol.
"""
