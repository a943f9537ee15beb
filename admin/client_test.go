package admin

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"stsmap/internal/fixture"
	"stsmap/policycache"
)

func TestClient(t *testing.T) {
	c := newFakeCache("example.com", "a.example")
	client := &Client{Socket: startServer(t, c)}
	ctx := t.Context()

	list, err := client.List(ctx)
	if err != nil || len(list) != 2 || list[1].Domain != "example.com" || list[1].MX[0] != "mx1.example.com" {
		t.Fatalf("List: got %+v, %v; want a.example and example.com", list, err)
	}
	e, err := client.Show(ctx, "Example.COM.")
	if err != nil || e.Domain != "example.com" || e.PolicyID != "20260101" || e.MaxAge != 86400 || !e.Expires.Equal(testTime.Add(24*3600e9)) {
		t.Errorf("Show: got %+v, %v", e, err)
	}
	if _, err := client.Show(ctx, "other.example"); !errors.Is(err, ErrNotCached) || err.Error() != "other.example is not cached" {
		t.Errorf("Show of an uncached domain: got %v, want ErrNotCached saying so", err)
	}
	if _, err := client.Show(ctx, ".example.com"); !errors.Is(err, ErrInvalidDomain) || !strings.Contains(err.Error(), "parent_domain") {
		t.Errorf("Show of a parent domain: got %v, want ErrInvalidDomain with the reason", err)
	}
	if _, err := client.Show(ctx, "a/b"); !errors.Is(err, ErrInvalidDomain) {
		t.Errorf("Show of a path: got %v, want ErrInvalidDomain", err)
	}

	e, err = client.Refresh(ctx, "bücher.example")
	if err != nil || e.Domain != "xn--bcher-kva.example" || e.PolicyID != "20260202" {
		t.Errorf("Refresh: got %+v, %v; want the refreshed entry of the A-label", e, err)
	}
	r, err := client.Purge(ctx, "EXAMPLE.COM")
	if err != nil || r != (PurgeResult{Domain: "example.com", Purged: 1}) {
		t.Errorf("Purge: got %+v, %v; want example.com purged", r, err)
	}
	r, err = client.Purge(ctx, "example.com")
	if err != nil || r.Purged != 0 {
		t.Errorf("Purge of an uncached domain: got %+v, %v; want nothing purged", r, err)
	}
	if n, err := client.PurgeAll(ctx); n != 2 || err != nil {
		t.Errorf("PurgeAll: got %d, %v; want 2", n, err)
	}
	if list, err := client.List(ctx); len(list) != 0 || err != nil {
		t.Errorf("List after PurgeAll: got %+v, %v; want none", list, err)
	}
}

// Failures reach the operator saying what failed.
func TestClientErrors(t *testing.T) {
	c := newFakeCache("example.com")
	c.storeErr = fmt.Errorf("policy store: %w", policycache.ErrStoreUnavailable)
	client := &Client{Socket: startServer(t, c)}
	_, err := client.Purge(t.Context(), "example.com")
	if err == nil || !strings.Contains(err.Error(), "removed from memory") || !strings.Contains(err.Error(), "store unavailable") {
		t.Errorf("Purge with a failing store: got %v, want it to say the store failed", err)
	}
	if _, err := client.PurgeAll(t.Context()); err == nil || !strings.Contains(err.Error(), "store unavailable") {
		t.Errorf("PurgeAll with a failing store: got %v, want it to say the store failed", err)
	}
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	if _, err := client.Refresh(t.Context(), "example.com"); err == nil || err.Error() != "stsmap is shutting down" {
		t.Errorf("Refresh while closing: got %v, want it to say stsmap is shutting down", err)
	}
}

func TestClientUnreachable(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	for _, sock := range []string{filepath.Join(dir, "missing.sock"), stale} {
		_, err := (&Client{Socket: sock}).List(t.Context())
		if !errors.Is(err, ErrUnreachable) {
			t.Errorf("List on %s: got %v, want ErrUnreachable", sock, err)
			continue
		}
		want := "cannot reach stsmap's admin socket " + sock + ": is stsmap running, and is admin.socket the same in its config?"
		if !strings.HasPrefix(err.Error(), want) {
			t.Errorf("List on %s: got %q, want it to start %q", sock, err, want)
		}
		if strings.Count(err.Error(), sock) != 1 {
			t.Errorf("List on %s: %q repeats the path", sock, err)
		}
	}
	// Root may open any socket, so the message is checked on the error.
	err = &unreachableError{socket: "/run/stsmap/admin.sock", err: &net.OpError{Op: "dial", Net: "unix",
		Err: os.NewSyscallError("connect", syscall.EACCES)}}
	want := "no permission to use stsmap's admin socket /run/stsmap/admin.sock: run this as the user stsmap runs as, or as root (connect: permission denied)"
	if err.Error() != want || !errors.Is(err, ErrUnreachable) {
		t.Errorf("permission denied: got %q, want %q", err, want)
	}
}

// A daemon without the admin endpoint (older, or another server on the
// socket) answers 404 in plain text.
func TestClientAgainstOtherServer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "other.sock")
	l, err := Listen(sock, DefaultSocketMode)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(newFakeCache(), fixture.QuietLogger())
	srv.http.Handler = nil // net/http's default mux: 404 for everything
	go srv.Serve(l)
	defer srv.Shutdown(t.Context())
	_, err = (&Client{Socket: sock}).List(t.Context())
	if err == nil || !strings.Contains(err.Error(), "404 Not Found") || !strings.Contains(err.Error(), "older") {
		t.Errorf("List against another server: got %v", err)
	}
}
