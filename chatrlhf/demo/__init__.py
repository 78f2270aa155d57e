"""The bundled demo task: a data generator and a programmatic judge (see `chatrlhf.demo.task`)."""
