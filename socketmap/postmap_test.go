package socketmap

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestPostmap asks Postfix's reference client (SPEC 1.6) over TCP and a unix
// socket. It skips without postmap, unless CI is set.
func TestPostmap(t *testing.T) {
	postmap, err := exec.LookPath("postmap")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI is set but postmap is missing: %v", err)
		}
		t.Skip("postmap not installed")
	}
	// An empty main.cf is all postmap needs.
	confDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(confDir, "main.cf"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		key      string
		wantOut  string
		wantExit int
	}{
		{"found", "secure match=.example.net\n", 0},
		{"example.com", "", 1},
		{"echo:x", "postfix|echo:x\n", 0},
	}
	ts := startServer(t, &Server{})
	for _, addr := range ts.addrs {
		table := "socketmap:inet:" + addr + ":postfix"
		if path, ok := strings.CutPrefix(addr, "unix:"); ok {
			table = "socketmap:unix:" + path + ":postfix"
		}
		for _, tt := range tests {
			t.Run(table+"/"+tt.key, func(t *testing.T) {
				var stdout, stderr bytes.Buffer
				cmd := exec.Command(postmap, "-c", confDir, "-q", tt.key, table)
				cmd.Stdout, cmd.Stderr = &stdout, &stderr
				err := cmd.Run()
				exit := 0
				if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
					exit = ee.ExitCode()
				} else if err != nil {
					t.Fatal(err)
				}
				if got := stdout.String(); got != tt.wantOut || exit != tt.wantExit {
					t.Errorf("postmap -q %s %s printed %q, exit %d; want %q, exit %d (stderr %q)",
						tt.key, table, got, exit, tt.wantOut, tt.wantExit, stderr.String())
				}
			})
		}
	}
}
