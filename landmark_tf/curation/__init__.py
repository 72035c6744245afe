"""Training-data curation: the loops from embeddings back into training (clean, pseudolabel).

clean: reads a labelled train embedding set (.npz from landmark-embed) and train.csv; writes a
  train_clean.csv-format list (landmark_id,images) that `landmark-tfrecords --clean_csv` or
  `--train_csv` takes as is, plus a per-class report CSV. Entry: `clean.clean(CleanConfig)`.
pseudolabel: reads a labelled embedding set and an unlabelled one (index, test or any CSV of
  images, embedded); writes a train.csv-format list (id,url,landmark_id,confidence) of the
  confident kNN labels. Entry: `pseudolabel.pseudolabel(PseudoLabelConfig)`.
`graph` holds the vectorised per-class neighbour graph and connected components both use.
"""
