"""SynthPed: the embedded, procedurally rendered person world (``download`` of ``source: synth``)."""
