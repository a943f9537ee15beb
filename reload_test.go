package main

import (
	"bufio"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// SIGHUP re-reads the config: a changed map setting takes effect, an open
// socketmap connection keeps working across the reload, and a broken config
// is refused with the old one left in force.
func TestReloadOnSIGHUP(t *testing.T) {
	w := newTestWorld(t)
	dir := t.TempDir()
	d := startDaemon(t, w, dir, "cache:\n  store: memory\n")
	cfgPath := filepath.Join(dir, "stsmap.yaml")
	base, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	open, err := net.Dial("unix", d.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	r := bufio.NewReader(open)
	if got := exchange(t, open, r, "postfix example.com"); got != exampleAnswer {
		t.Fatalf("before the reload: got %q", got)
	}

	hup := func(body string) {
		t.Helper()
		if err := os.WriteFile(cfgPath, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		d.cmd.Process.Signal(syscall.SIGHUP)
	}
	waitLog := func(want string, n int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for strings.Count(d.logs(), want) < n {
			if time.Now().After(deadline) {
				t.Fatalf("no %q in the log after SIGHUP:\n%s", want, d.logs())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	const noServername = "OK secure match=mx1.example.com:.example.net"
	hup(string(base) + "maps:\n  postfix: {servername: false}\nlog:\n  level: debug\n")
	waitLog("config reloaded", 1)
	if got := exchange(t, open, r, "postfix example.com"); got != noServername {
		t.Errorf("on the connection opened before the reload: got %q, want %q", got, noServername)
	}
	if got := d.ask(t, "postfix example.com"); got != noServername {
		t.Errorf("after the reload: got %q, want %q", got, noServername)
	}

	hup(string(base) + "maps:\n  postfix: {servername: maybe}\n")
	waitLog("config reload refused", 1)
	if !strings.Contains(d.logs(), "maps.postfix.servername") {
		t.Errorf("the refusal does not name the key:\n%s", d.logs())
	}
	if got := exchange(t, open, r, "postfix example.com"); got != noServername {
		t.Errorf("after a refused reload: got %q, want the running config's %q", got, noServername)
	}

	hup(string(base) + "dane: off\n")
	waitLog("these settings change only with a restart", 1)
	if !strings.Contains(d.logs(), "settings=dane") {
		t.Errorf("the restart warning does not name dane:\n%s", d.logs())
	}
}
