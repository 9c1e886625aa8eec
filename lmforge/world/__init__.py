"""The built-in world: fictional people and companies generated from a seed (`people`), what is
written about them (`documents`), red-teaming (`safety`), preference pairs (`preferences`), a
context store of current facts (`store`), and evaluation tasks registered with eval (`tasks`).
Generic code never imports it; the command line and the demo do."""
