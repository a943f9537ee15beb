package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"stsmap/admin"
	"stsmap/config"
)

const cacheUsage = `usage:
  stsmap cache [-config FILE] [-socket PATH] list [-json]
                                           the running daemon's cached policies
  stsmap cache [-config FILE] [-socket PATH] show DOMAIN
                                           one cached entry, as JSON
  stsmap cache [-config FILE] [-socket PATH] purge DOMAIN | purge -all
                                           forget cached policies; the next lookup discovers afresh
  stsmap cache [-config FILE] [-socket PATH] refresh DOMAIN
                                           re-check DOMAIN now and print its entry
The daemon's admin socket is -socket, else the one its config (-config,
default: the embedded defaults) gives. Exit status: 0 done, 1 not cached or
failed, 2 usage.
`

// adminSocketPath is where the daemon listens for `stsmap cache` commands:
// admin.sock beside the policy store (cache.path, or the state directory it
// defaults to), so that the daemon and the command agree on it from the
// same config.
func adminSocketPath(cfg *config.Config) (string, error) {
	switch cfg.Admin.Socket {
	case "none":
		return "", errors.New("admin.socket is none: the admin socket is off")
	case "":
	default:
		return cfg.Admin.Socket, nil
	}
	path, err := cfg.StorePath()
	if err != nil {
		return "", err
	}
	return filepath.Join(filepath.Dir(path), "admin.sock"), nil
}

// runCache runs `stsmap cache ...` against the running daemon's admin
// socket.
func runCache(ctx context.Context, args []string, e *env) int {
	var cfgPath, socket string
	var asJSON, all bool
	// -config and -socket are taken before and after the subcommand; the
	// second flag set starts from what the first parsed.
	newFlags := func(name string) *flag.FlagSet {
		fs := newFlagSet(name, e)
		fs.Usage = func() { fmt.Fprint(e.stderr, cacheUsage) }
		fs.StringVar(&cfgPath, "config", cfgPath, "the daemon's config file (default: embedded defaults)")
		fs.StringVar(&socket, "socket", socket, "the daemon's admin socket (default: from the config)")
		return fs
	}
	fs := newFlags("cache")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if fs.NArg() == 0 {
		fmt.Fprint(e.stderr, cacheUsage)
		return exitUsage
	}
	cmd := fs.Arg(0)
	sub := newFlags("cache " + cmd)
	wantArgs := 1
	switch cmd {
	case "list":
		sub.BoolVar(&asJSON, "json", false, "print the entries as JSON")
		wantArgs = 0
	case "purge":
		sub.BoolVar(&all, "all", false, "purge every domain")
	case "show", "refresh":
	default:
		fmt.Fprintf(e.stderr, "stsmap: unknown cache command %q\n%s", cmd, cacheUsage)
		return exitUsage
	}
	if err := sub.Parse(fs.Args()[1:]); err != nil {
		return exitUsage
	}
	if all {
		wantArgs = 0
	}
	if sub.NArg() != wantArgs {
		fmt.Fprint(e.stderr, cacheUsage)
		return exitUsage
	}
	domain := sub.Arg(0)

	defaultSocket := socket == "" && cfgPath == ""
	if socket == "" {
		cfg, err := loadConfig(cfgPath)
		if err != nil {
			fmt.Fprintf(e.stderr, "stsmap: %v\n", err)
			return exitUsage
		}
		if socket, err = adminSocketPath(cfg); err != nil {
			fmt.Fprintf(e.stderr, "stsmap: the admin socket's place: %v\n", err)
			return exitUsage
		}
	}
	client := &admin.Client{Socket: socket}

	var err error
	switch {
	case cmd == "list":
		var list []admin.Entry
		if list, err = client.List(ctx); err == nil {
			if asJSON {
				err = printJSON(e, list)
			} else {
				printTable(e, list)
			}
		}
	case cmd == "show":
		var entry admin.Entry
		if entry, err = client.Show(ctx, domain); err == nil {
			err = printJSON(e, entry)
		}
	case cmd == "purge" && all:
		var n int
		if n, err = client.PurgeAll(ctx); err == nil {
			fmt.Fprintf(e.stdout, "purged %d entries\n", n)
		}
	case cmd == "purge":
		var r admin.PurgeResult
		if r, err = client.Purge(ctx, domain); err == nil {
			if r.Purged == 0 {
				fmt.Fprintf(e.stdout, "%s was not cached\n", r.Domain)
				return exitNotFound
			}
			fmt.Fprintf(e.stdout, "purged %s\n", r.Domain)
		}
	case cmd == "refresh":
		var entry admin.Entry
		if entry, err = client.Refresh(ctx, domain); err == nil {
			err = printJSON(e, entry)
		}
	}
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, admin.ErrInvalidDomain):
		fmt.Fprintf(e.stderr, "stsmap: %v\n", err)
		return exitUsage
	case errors.Is(err, admin.ErrUnreachable) && defaultSocket:
		fmt.Fprintf(e.stderr, "stsmap: %v\n(that is the socket of the embedded defaults: give -config the daemon's config file, or -socket its admin socket)\n", err)
		return exitNotFound
	default:
		fmt.Fprintf(e.stderr, "stsmap: %v\n", err)
		return exitNotFound
	}
}

func printJSON(e *env, v any) error {
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// maxMXColumn bounds the MX column of `stsmap cache list`; -json and show
// give them all.
const maxMXColumn = 60

func printTable(e *env, list []admin.Entry) {
	tw := tabwriter.NewWriter(e.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tMODE\tPOLICY_ID\tEXPIRES\tMX")
	for _, entry := range list {
		mode := entry.Mode
		if mode == "" {
			mode = "(" + entry.Reason + ")" // no policy: why
		}
		mx := strings.Join(entry.MX, ",")
		if len(mx) > maxMXColumn {
			mx = mx[:maxMXColumn-3] + "..."
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", entry.Domain, mode, orDash(entry.PolicyID),
			entry.Expires.UTC().Format(time.RFC3339), orDash(mx))
	}
	tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
