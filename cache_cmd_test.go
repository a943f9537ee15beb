package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"stsmap/admin"
	"stsmap/internal/fixture"
)

// Each `stsmap cache` command against the daemon running in-process, on the
// fixture world.
func TestCacheCommands(t *testing.T) {
	w := newTestWorld(t)
	cfg := testConfig(w, "127.0.0.1:0")
	cfg.Admin.Socket = filepath.Join(t.TempDir(), "admin.sock")
	sock, err := adminSocketPath(cfg)
	if err != nil {
		t.Fatal(err)
	}
	addrs := startServe(t, cfg, testEnv(w))
	st, err := os.Stat(sock)
	if err != nil {
		t.Fatalf("admin socket: %v", err)
	}
	if st.Mode().Perm() != admin.DefaultSocketMode {
		t.Errorf("admin socket mode: got %v, want %v", st.Mode().Perm(), admin.DefaultSocketMode)
	}

	c, err := net.Dial("tcp", addrs[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	lookup := func(key string) string {
		t.Helper()
		return exchange(t, c, r, "postfix "+key)
	}
	cache := func(args ...string) (int, string, string) {
		t.Helper()
		return runCmd(t, testEnv(w), append([]string{"cache", "-socket", sock}, args...)...)
	}
	const oldAnswer = "OK secure match=mx1.example.com:.example.net servername=hostname"
	if got := lookup("example.com"); got != oldAnswer {
		t.Fatalf("lookup: got %q, want %q", got, oldAnswer)
	}

	t.Run("list", func(t *testing.T) {
		status, out, stderr := cache("list")
		row := regexp.MustCompile(`(?m)^example\.com +enforce +20260101 +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ +mx1\.example\.com,\*\.example\.net$`)
		if status != exitOK || !strings.HasPrefix(out, "DOMAIN ") || !row.MatchString(out) {
			t.Errorf("cache list: got status %d output %q (stderr %q), want a row for example.com", status, out, stderr)
		}
		status, out, _ = cache("list", "-json")
		var list []admin.Entry
		if err := json.Unmarshal([]byte(out), &list); status != exitOK || err != nil || len(list) != 1 || list[0].Domain != "example.com" {
			t.Errorf("cache list -json: got status %d, %v, %s; want example.com", status, err, out)
		}
	})

	t.Run("show", func(t *testing.T) {
		status, out, stderr := cache("show", "Example.COM.")
		var e admin.Entry
		if err := json.Unmarshal([]byte(out), &e); status != exitOK || err != nil {
			t.Fatalf("cache show: got status %d, %v in %q (stderr %q)", status, err, out, stderr)
		}
		if e.Domain != "example.com" || e.PolicyID != "20260101" || e.Mode != "enforce" || e.MaxAge != 86400 || e.Reason != "policy" || e.Expires.IsZero() {
			t.Errorf("cache show: got %+v", e)
		}
		if status, _, stderr := cache("show", "other.example"); status != exitNotFound || !strings.Contains(stderr, "other.example is not cached") {
			t.Errorf("cache show of an uncached domain: got status %d stderr %q, want %d saying so", status, stderr, exitNotFound)
		}
		if status, _, stderr := cache("show", ".example.com"); status != exitUsage || !strings.Contains(stderr, "parent_domain") {
			t.Errorf("cache show of a parent domain: got status %d stderr %q, want %d and the reason", status, stderr, exitUsage)
		}
	})

	// Purge, the remedy for a policy changed without a new id: the next
	// lookup discovers the domain afresh.
	t.Run("purge", func(t *testing.T) {
		txt, fetches := w.DNS.QueriesFor("_mta-sts.example.com"), w.Policy.Fetches()
		w.Policy.SetPolicy("example.com", fixture.PolicyBody("enforce", 86400, "mx3.example.com")) // same id
		if got := lookup("example.com"); got != oldAnswer {
			t.Errorf("lookup before the purge: got %q, want the cached %q", got, oldAnswer)
		}
		if status, out, stderr := cache("purge", "example.com"); status != exitOK || out != "purged example.com\n" {
			t.Errorf("cache purge: got status %d output %q (stderr %q)", status, out, stderr)
		}
		if status, out, _ := cache("purge", "EXAMPLE.com"); status != exitNotFound || out != "example.com was not cached\n" {
			t.Errorf("cache purge again: got status %d output %q, want %d and not cached", status, out, exitNotFound)
		}
		if got, want := lookup("example.com"), "OK secure match=mx3.example.com servername=hostname"; got != want {
			t.Errorf("lookup after the purge: got %q, want the policy now published %q", got, want)
		}
		if q, f := w.DNS.QueriesFor("_mta-sts.example.com")-txt, w.Policy.Fetches()-fetches; q != 1 || f != 1 {
			t.Errorf("lookup after the purge: got %d TXT queries and %d fetches, want a fresh discovery (1 and 1)", q, f)
		}
	})

	// Refresh: a new id is served at once, not at the next refresh interval.
	t.Run("refresh", func(t *testing.T) {
		w.DNS.Remove("_mta-sts.example.com", dns.TypeTXT)
		w.DNS.Add(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=20260202"`)
		w.Policy.SetPolicy("example.com", fixture.PolicyBody("enforce", 86400, "mx2.example.com"))
		status, out, stderr := cache("refresh", "example.com")
		var e admin.Entry
		if err := json.Unmarshal([]byte(out), &e); status != exitOK || err != nil {
			t.Fatalf("cache refresh: got status %d, %v in %q (stderr %q)", status, err, out, stderr)
		}
		if e.PolicyID != "20260202" || len(e.MX) != 1 || e.MX[0] != "mx2.example.com" {
			t.Errorf("cache refresh: got %+v, want the new id and policy", e)
		}
		fetches := w.Policy.Fetches()
		if got, want := lookup("example.com"), "OK secure match=mx2.example.com servername=hostname"; got != want {
			t.Errorf("lookup after the refresh: got %q, want %q", got, want)
		}
		if w.Policy.Fetches() != fetches {
			t.Errorf("lookup after the refresh fetched the policy; want it from the cache")
		}
		// An uncached domain is discovered.
		status, out, _ = cache("refresh", "testing.example")
		if status != exitOK || !strings.Contains(out, `"mode": "testing"`) {
			t.Errorf("cache refresh of an uncached domain: got status %d output %q, want its testing policy", status, out)
		}
	})

	t.Run("purge -all", func(t *testing.T) {
		if status, out, stderr := cache("purge", "-all"); status != exitOK || out != "purged 2 entries\n" {
			t.Errorf("cache purge -all: got status %d output %q (stderr %q), want 2 purged", status, out, stderr)
		}
		if status, out, _ := cache("list"); status != exitOK || strings.Count(out, "\n") != 1 {
			t.Errorf("cache list after purge -all: got status %d output %q, want the header alone", status, out)
		}
		fetches := w.Policy.Fetches()
		lookup("example.com")
		if w.Policy.Fetches() != fetches+1 {
			t.Errorf("lookup after purge -all: want a fresh fetch")
		}
	})
}

// runCacheCmd runs `stsmap cache args...`.
func runCacheCmd(t *testing.T, args ...string) (status int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	status = runCache(context.Background(), args, &env{stdout: &out, stderr: &errb})
	return status, out.String(), errb.String()
}

func TestCacheCommandUsage(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	t.Setenv("STATE_DIRECTORY", dir) // the embedded defaults' socket: dir/admin.sock
	tests := []struct {
		args       []string
		wantStatus int
		wantErr    string // substring of stderr
	}{
		{nil, exitUsage, "usage:"},
		{[]string{"frobnicate"}, exitUsage, `unknown cache command "frobnicate"`},
		{[]string{"show"}, exitUsage, "usage:"},
		{[]string{"purge"}, exitUsage, "usage:"},
		{[]string{"purge", "-all", "example.com"}, exitUsage, "usage:"},
		{[]string{"refresh", "a.example", "b.example"}, exitUsage, "usage:"},
		{[]string{"list", "extra"}, exitUsage, "usage:"},
		{[]string{"list", "-bogus"}, exitUsage, "usage:"},
		{[]string{"-config", "/nonexistent/stsmap.yaml", "list"}, exitUsage, "/nonexistent/stsmap.yaml"},
		{[]string{"-socket", missing, "list"}, exitNotFound, "cannot reach stsmap's admin socket " + missing + ": is stsmap running"},
		{[]string{"show", "-socket", missing, "example.com"}, exitNotFound, "cannot reach stsmap's admin socket " + missing},
		{[]string{"list"}, exitNotFound, "admin socket " + filepath.Join(dir, "admin.sock") + ": is stsmap running"},
		{[]string{"list"}, exitNotFound, "give -config the daemon's config file, or -socket"},
	}
	for _, tt := range tests {
		status, _, stderr := runCacheCmd(t, tt.args...)
		if status != tt.wantStatus || !strings.Contains(stderr, tt.wantErr) {
			t.Errorf("stsmap cache %s: got status %d stderr %q, want %d and %q", strings.Join(tt.args, " "), status, stderr, tt.wantStatus, tt.wantErr)
		}
	}
}
