"""landmark-evaluate: kNN retrieval / recognition over embedding sets, Kaggle metrics, submissions.

Retrieval (GLR2019/2020):
  landmark-evaluate --index index.npz --queries test.npz \
      --solution retrieval_solution_v2.1.csv --submission submission.csv --rerank dba+aqe
Recognition (GLR2020):
  landmark-evaluate --train train.npz --queries test.npz \
      --recognition_solution recognition_solution_v2.1.csv --recognition_submission rec.csv \
      [--nonlandmark nonlandmark.npz --nonlandmark_method both]
Retrieval with the GLR2019 winner's discriminative re-ranking (after alpha-QE):
  landmark-evaluate --index index.npz --queries test.npz --train train.npz \
      --rerank discriminative+aqe --solution retrieval_solution_v2.1.csv
Retrieval with diffusion (or --rerank egt) over the index's k-NN graph, kept for other query sets:
  landmark-evaluate --index index.npz --queries test.npz --rerank diffusion \
      --graph_cache /data/graphs --solution retrieval_solution_v2.1.csv
Retrieval with SuperGlobal re-ranking of the top 400 (training-free), after database augmentation:
  landmark-evaluate --index index.npz --queries test.npz --rerank superglobal+dba \
      --solution retrieval_solution_v2.1.csv
Revisited Oxford/Paris:
  landmark-evaluate --index roxford_db.npz --queries roxford_q.npz --revisitop_gnd gnd_roxford5k.pkl

Without a solution file, labelled sets (landmark_ids in the .npz) are scored against each other.
Last stdout line: JSON with map@100[, map@100_public, map@100_private], gap[, ...], ...
"""

from __future__ import annotations

import dataclasses

from absl import flags

from landmark_tf.cli import app as app_lib
from landmark_tf.errors import UserError
from landmark_tf.retrieval import evaluation, knn

_D = evaluation.EvalConfig
flags.DEFINE_string("queries", None, "Query embedding set (.npz: ids, embeddings[, landmark_ids]).")
flags.DEFINE_string("index", None, "Index (database) embedding set for retrieval (.npz).")
flags.DEFINE_string(
    "train", None, "Labelled embedding set (.npz with landmark_ids) for recognition."
)
flags.DEFINE_integer("k", _D.k, "Neighbours retrieved per query (Kaggle scores the first 100).")
flags.DEFINE_integer("batch_size", knn.DEFAULT_BATCH, "Queries per faiss call; keep it large.")
flags.DEFINE_enum(
    "index_type",
    _D.index_type,
    ["flat", "ivf"],
    "flat: exact search; ivf: inverted-file approximate search for 1M+ images.",
)
flags.DEFINE_integer("nlist", _D.nlist, "IVF lists; 0 = about 4*sqrt(N).")
flags.DEFINE_bool(
    "spherical_kmeans",
    _D.spherical_kmeans,
    "IVF: train the coarse quantiser by spherical k-means (unit centroids, what inner-product "
    "assignment needs); --nospherical_kmeans is faiss' plain k-means.",
)
flags.DEFINE_integer("nprobe", _D.nprobe, "IVF lists visited per query (more = slower, better).")
flags.DEFINE_integer(
    "recall_sample",
    _D.recall_sample,
    "Queries on which IVF recall@k against exact search is measured; 0 = skip.",
)
flags.DEFINE_enum(
    "rerank",
    _D.rerank,
    list(evaluation.RERANK_METHODS),
    "Re-ranking: alpha-query expansion (aqe), database-side augmentation (dba), or both. dba "
    "searches the whole index against itself through the same index type (flat: exact N^2, "
    "hours at 1M images on 2 cores; ivf: approximate, far faster). "
    "discriminative[+...]: then two-stage discriminative re-ranking (Yokoo et al. 2020, the "
    "GLR2019 winner): label queries and index by kNN votes over --train, move the index images "
    "of the query's landmark ahead and insert unretrieved ones; needs --train. "
    "diffusion: Iscen et al. 2017 on the index's mutual k-NN graph (--diffusion_*); egt[+dba+aqe]: "
    "explore-exploit graph traversal, Chang et al. 2019 (--egt_*); both build the index's k-NN "
    "graph first (a self-search of the index; cache it with --graph_cache). "
    "superglobal[+...]: SuperGlobal re-ranking (Shao et al. 2023) of each query's top "
    "--superglobal_shortlist by refined global descriptors, after aqe/dba vectors and before "
    "the discriminative step; also re-orders the revisitop rankings.",
)
flags.DEFINE_integer(
    "superglobal_shortlist", _D.superglobal_shortlist,
    "superglobal: database images re-ranked per query (M; the search retrieves max(k, M)).",
)
flags.DEFINE_integer(
    "superglobal_neighbours", _D.superglobal_neighbours,
    "superglobal: shortlist neighbours averaged into each refined vector (itself included), "
    "and refined vectors whose elementwise max expands the query (K + 1 of the paper's code).",
)
flags.DEFINE_float(
    "superglobal_beta", _D.superglobal_beta,
    "superglobal: a neighbour's weight is beta x its similarity (the vector itself weighs 1).",
)
flags.DEFINE_string(
    "graph_cache",
    None,
    "Local folder caching the index's k-NN graph for diffusion/egt, keyed by the index vectors, "
    "k and the search settings: later runs (other query sets) reuse it. Unset: a temporary one.",
)
flags.DEFINE_integer("diffusion_k", _D.diffusion_k,
                     "diffusion: neighbours per index image in the graph (50 in the authors' code "
                     "for global descriptors; up to 1000).")
flags.DEFINE_integer("diffusion_kq", _D.diffusion_kq,
                     "diffusion: the query's top rows that seed the diffusion (y).")
flags.DEFINE_integer("diffusion_truncation", _D.diffusion_truncation,
                     "diffusion: the query's top rows whose sub-graph is solved (truncation).")
flags.DEFINE_float("diffusion_gamma", _D.diffusion_gamma, "diffusion: similarity exponent.")
flags.DEFINE_float("diffusion_alpha", _D.diffusion_alpha, "diffusion: alpha in (I - alpha S)f = y.")
flags.DEFINE_integer("diffusion_iterations", _D.diffusion_iterations,
                     "diffusion: conjugate-gradient iterations (tolerance 1e-6).")
flags.DEFINE_integer("egt_k", _D.egt_k, "egt: neighbours per image in the traversed graph.")
flags.DEFINE_float("egt_threshold", _D.egt_threshold,
                   "egt: exploit threshold t on cosine similarity; inf = pure explore (Prim).")
flags.DEFINE_float(
    "rerank_threshold",
    _D.rerank_threshold,
    "discriminative: label confidence (sum of 2cos-1 over 3 train neighbours) a query needs for "
    "the insert step, and an index image needs to be inserted (0 as in the winners' code).",
)
flags.DEFINE_integer("qe_k", _D.qe_k, "Neighbours used by aqe and dba.")
flags.DEFINE_float(
    "aqe_alpha", _D.aqe_alpha, "Exponent on neighbour similarity for aqe/dba weights."
)
flags.DEFINE_string("solution", None, "Kaggle retrieval_solution_v2.1.csv (id,images,Usage).")
flags.DEFINE_string("submission", None, "Write a Kaggle retrieval submission (id,images) here.")
flags.DEFINE_integer(
    "recognition_k",
    _D.recognition_k,
    "Train neighbours whose similarities are summed per landmark.",
)
flags.DEFINE_string(
    "recognition_solution", None, "Kaggle recognition_solution_v2.1.csv (id,landmarks,Usage)."
)
flags.DEFINE_string(
    "recognition_submission", None, "Write a Kaggle recognition submission (id,landmarks) here."
)
flags.DEFINE_string(
    "revisitop_gnd",
    None,
    "Revisited Oxford/Paris ground truth (gnd_roxford5k.pkl layout); index and "
    "query ids must equal its imlist/qimlist names.",
)
flags.DEFINE_string(
    "training_data",
    None,
    "Which training list built the model, printed beside every revisitop score: a "
    "landmark-tfrecords folder, a training workdir or an export. Without it, the list the "
    "embedding sets carry (landmark-embed writes it), else 'unknown training list'.",
)
flags.DEFINE_string(
    "nonlandmark",
    None,
    "Embedding set (.npz) of images of no landmark (e.g. GLDv2 test images whose recognition "
    "solution is empty; landmark-synth's nonlandmark.csv): lowers the recognition confidence of "
    "queries that look like them. Needs --train.",
)
flags.DEFINE_enum(
    "nonlandmark_method",
    _D.nonlandmark_method,
    ["penalty", "classifier", "both"],
    "penalty: c - lambda * mean similarity to the n nearest non-landmark images; classifier: "
    "c * P(landmark) of a logistic regression on embeddings; both: P * c - lambda * m. lambda "
    "and n are tuned on a validation split of --train and --nonlandmark.",
)
flags.DEFINE_float(
    "penalty_weight", _D.penalty_weight, "Fix lambda instead of tuning it (< 0: tune)."
)
flags.DEFINE_integer(
    "penalty_neighbours", _D.penalty_neighbours, "Fix n instead of tuning it (0: tune)."
)
flags.DEFINE_integer("seed", _D.seed, "Seed for IVF training and the recall sample.")

FLAGS = flags.FLAGS
_FIELDS = [f.name for f in dataclasses.fields(evaluation.EvalConfig)]


def main(argv: list[str]) -> dict:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {argv[1:]}")
    cfg = evaluation.EvalConfig(**{name: FLAGS[name].value for name in _FIELDS})
    return evaluation.evaluate(cfg)


def run() -> None:
    app_lib.run_main(main, "landmark-evaluate")


if __name__ == "__main__":
    run()
