package main

import (
	"context"
	"fmt"
	"log/slog"

	"stsmap/policymap"
)

// runQuery looks one key up as the daemon would and prints what Postfix
// would receive after "OK " (nothing for NOTFOUND). Unlike the daemon it
// waits for the whole discovery (fetch.timeout), not the first-contact
// deadline, so that it can say what the domain publishes.
func runQuery(ctx context.Context, args []string, e *env) int {
	fs := newFlagSet("query", e)
	path := fs.String("config", "", "config file (default: embedded defaults)")
	mapName := fs.String("map", "postfix", "socketmap map name whose settings apply")
	asJSON := fs.Bool("json", false, "print the normalised domain, policy and reason as JSON")
	verbose := fs.Bool("v", false, "log discovery to stderr")
	if err := fs.Parse(args); err != nil || fs.NArg() != 1 {
		fmt.Fprint(e.stderr, usage)
		return exitUsage
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		fmt.Fprintf(e.stderr, "stsmap: %v\n", err)
		return exitUsage
	}
	log := slog.New(slog.DiscardHandler)
	if *verbose {
		log = newLogger(cfg, e.stderr)
	}
	res, err := newResolver(cfg, e)
	if err != nil {
		fmt.Fprintf(e.stderr, "stsmap: %v\n", err)
		return exitUsage
	}
	cfg.Fetch.FirstContactTimeout = cfg.Fetch.Timeout
	cache := newCache(cfg, res, nil, false, nil, log) // live discovery only: the daemon may hold the store
	defer cache.Close()

	h := &policymap.Handler{Cache: cache, DANETimeout: cfg.Fetch.Timeout}
	if cfg.DANE == "auto" {
		checker := newDANE(res, log)
		defer checker.Close()
		h.DANE = checker
	}
	r := h.Explain(ctx, fs.Arg(0), policymap.Settings(cfg.MapSettings(*mapName)))
	if *asJSON {
		if err := printJSON(e, r); err != nil {
			fmt.Fprintf(e.stderr, "stsmap: %v\n", err)
			return exitUsage
		}
	} else if r.Found {
		fmt.Fprintln(e.stdout, r.Answer)
	}
	if !r.Found {
		return exitNotFound
	}
	return exitOK
}
