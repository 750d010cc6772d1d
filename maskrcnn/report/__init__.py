"""The weekly check-up (`visualize.py report`) in three rooms: `measure.py` runs the model and writes every number
to report.json (and the pictures to img/), `page.py` renders index.html from report.json alone, and
`command.py` runs the two for the command line. The pictures are drawn by maskrcnn/vis/report_figures.py, the
training steps timed by maskrcnn/engine/step.py."""
