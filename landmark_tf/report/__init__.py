"""The report: one HTML page a person can look at after a run (demo or GLDv2).

Reads: each run's workdir (config.json, summary.json, TensorBoard event files under logs/), the
closing JSON of landmark-evaluate per model, retrieval / recognition submission CSVs (or, for a
model without a submission, its index/test embedding sets), the Kaggle solution files and the
images of the dataset's own GLDv2 tree (`ROOT/{train,index,test}/a/b/c/<id>.jpg`).
Writes: OUTPUT_DIR/index.html, curves.png, retrieval.png, recognition.png and marks.json (the
marks drawn on the retrieval grid and recognition strip, for checking against the solution).
Entry function: `page.write_report(ReportConfig)`.
"""
