"""Models: the separator, its Beta mask policy, and the query/reward encoders."""
