// Command bcrypthash makes bcrypt hashes with Go's golang.org/x/crypto/bcrypt, an implementation
// independent of the Python bcrypt package the server uses, for the import tests.
//
// Each input line is "<cost> <password>"; each output line is the hash ("$2a$", Go's prefix).
package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

func main() {
	in := bufio.NewScanner(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for in.Scan() {
		cost, password, ok := strings.Cut(in.Text(), " ")
		if !ok {
			fail("want \"<cost> <password>\"")
		}
		n, err := strconv.Atoi(cost)
		if err != nil {
			fail(err.Error())
		}
		hash, err := bcrypt.GenerateFromPassword([]byte(password), n)
		if err != nil {
			fail(err.Error())
		}
		fmt.Fprintln(out, string(hash))
	}
	if err := in.Err(); err != nil {
		fail(err.Error())
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "bcrypthash:", message)
	os.Exit(1)
}
