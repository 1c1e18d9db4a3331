"""Quality tooling: `lookalike eval` (recall of shopper photos through a running server), the shopper-photo
simulator, the HTML reports and the demo's sample catalog built from images that installed packages ship."""
